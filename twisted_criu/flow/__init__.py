"""Flow control: moving image bytes between pipes, sockets and stores at the pace of the slowest."""
