"""CRIU's side: the local image protocols criu speaks on UNIX sockets."""
