"""The request path, the fourth stage: what wraps a model's code and a server's requests, and feeds the stages
below.

``steps`` is ``@instrument_step`` (a step's series and span); ``request_spans`` is the one HTTP request path
of every server (KServe REST, plain ASGI): the request's span, its HTTP metrics and the endpoint served
inline.
"""
