"""zkv's pure core: what the shells around it (the node, the proxies, the clients, the
RESP front) decide with, as functions and state machines over data. No module here
opens a socket, reads a clock or touches a file: each takes its input (requests,
replies, log records, ``now``) and returns what to send, apply or answer, and each is
tested without a process.
"""
