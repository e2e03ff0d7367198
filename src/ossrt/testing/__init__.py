"""Test and benchmark support: synthetic gpt-oss checkpoints."""
