"""Quality evaluation of the codecs on a real model."""
