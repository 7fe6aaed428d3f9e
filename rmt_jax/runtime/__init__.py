"""The process around a command: a quiet start (TensorFlow's and absl's startup noise) and which
memory allocator the host runs.

May import: the standard library only.
"""
