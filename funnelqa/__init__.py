"""funnelqa: teach language models to ask funnel questions that elicit preferences."""

__version__ = "0.1.0"
