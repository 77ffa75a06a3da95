"""What stays on disk: the workspace, atomic artifact I/O, validation, row stores and metrics."""
