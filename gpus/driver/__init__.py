"""The NVIDIA driver's user-space files as a CDI spec needs them.

``ldcache`` reads (and, for fake driver roots, writes) ``/etc/ld.so.cache``; ``elf`` reads (and
writes stub) shared objects' ``DT_SONAME``; ``discover`` finds the driver's libraries, binaries,
firmware, IPC sockets and device nodes under a driver root the way NVIDIA's container toolkit
v1.20 does.
"""
