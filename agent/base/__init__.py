"""What every room of the agent stands on: settings, the engine's slots, meters, heap and
process upkeep, logging and sd_notify. Imports nothing else of the agent (a layers contract)."""
