"""Encoders (``resnet``) and MIL aggregators (``mil``)."""
