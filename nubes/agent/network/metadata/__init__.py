"""The metadata service: one asyncio HTTP server per host, listening inside every VPC.

`documents` renders what a VM may read (OpenStack, EC2 and NoCloud trees) as pure
functions; `server` answers HTTP with them, identifying the VM by (VPC, source address).
"""
