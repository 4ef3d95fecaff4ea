"""The tool's version: written into measurement.json, quantization_config and the model card."""

VERSION = "0.1.0"
