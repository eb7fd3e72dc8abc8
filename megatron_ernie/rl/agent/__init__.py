"""Multi-turn agent episodes: token assembly with environment masks, tool calls. Pure functions."""
