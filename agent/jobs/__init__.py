"""Jobs: intake, the job service, replies, inputs and the auto decision."""
