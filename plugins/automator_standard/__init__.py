"""The standard step types of automator, each an ordinary pluggy plugin."""
