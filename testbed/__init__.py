"""The namespace test bed: several "hosts" on one Linux box (``prism-agent testbed``)."""
