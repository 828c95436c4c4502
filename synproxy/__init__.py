"""synproxy: a transparent cookie SYN proxy on netfilter queues."""

__version__ = "0.1.0"
