"""The prism-agent daemon and its command line."""
