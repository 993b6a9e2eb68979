"""``torchglow demo``: a local web page over a trained model (command, server, request guards,
session, uploads, page)."""
