"""The demo client: times Echo over plain gRPC and over shmgrpc, checks every
byte, and prints a table per message size. `python -m client_example --help`.
"""
