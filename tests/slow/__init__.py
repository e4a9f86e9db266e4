"""
The slow tier: tests that start real processes (C{twistd} daemons, a real
criu, the demo, a wheel build, command-line tools) or wait in real time.

C{admin/test --fast} leaves this package out; plain C{admin/test} runs it
too.  Everything under C{tests} but outside this package is the fast tier:
in one process, on fakes or loopback sockets.
"""
