"""Safetensors checkpoint I/O and the mtptune head checkpoint format."""
