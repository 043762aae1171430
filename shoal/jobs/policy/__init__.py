"""Job policies as plain logic over a message's options: no broker calls, no clocks read."""
