"""Make daphne's Twisted request stop parsing multipart bodies that Django parses again anyway.

Twisted's `Request.requestReceived` decodes every multipart/form-data POST into `request.args`
with the `email` package, holding the whole body in memory many times over (a 1 GiB upload took
13.8 GiB and minutes). Daphne never reads `args`: Django parses the body from the ASGI messages,
streaming files to disk. Twisted's own switch for this (`parsePOSTFormSubmission`) is forced off.
"""

from __future__ import annotations


def stop_twisted_form_parsing() -> bool:
    """Turn off Twisted's form parsing for daphne's requests; False when daphne is not installed."""
    try:
        from daphne.http_protocol import WebRequest
    except ImportError:
        return False
    # A data descriptor on the class wins over Request.__init__'s instance assignment.
    WebRequest._parsePOSTFormSubmission = property(lambda self: False, lambda self, value: None)
    return True
