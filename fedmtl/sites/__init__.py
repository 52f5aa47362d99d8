"""Sites: clients that run on their own machines (docs/sites.md).

What is here so far are the trust primitives the coordinator and the sites share, with no
Prefect and no MLflow:

- :mod:`fedmtl.sites.identity`: each party's Ed25519 key pair (a site's, the coordinator's), kept
  in a private file, and the set of public keys a party trusts;
- :mod:`fedmtl.sites.envelope`: a signed envelope around every message (the global state a
  coordinator sends, an update a site returns), bound to its sender, run, round and kind, so that
  a tampered, replayed or impersonated message is refused, naming the site;
- :mod:`fedmtl.sites.exchange`: the exchange store the envelopes travel through, any fsspec URL
  (a local folder, S3, GCS, Azure), written atomically;
- :mod:`fedmtl.sites.wire`: the server state and a client update as bytes (tensors and plain
  values only, loaded with ``weights_only``).
"""
