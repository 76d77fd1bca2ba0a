from funnelqa.cli import main

main()
