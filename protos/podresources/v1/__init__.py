"""Generated stubs of the kubelet PodResources API v1 (``make protos``)."""
