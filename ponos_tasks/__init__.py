"""ponos-vast: a Ponos agent for Arkindex that runs GPU tasks on rented Vast.ai instances."""

__version__ = "0.1.0"
