"""``torchglow demo``: a local web page over a trained model (session, server, request guards, page)."""
