"""The synthetic sample source: coloured shapes moving in known directions, with true captions,
served on 127.0.0.1 in the formats of the real sources (HD-VG metadata + videos, an Inter4k-style
zip behind a redirect, a Pexels-compatible API), and the scorer that reads them back.

    scenes.py     vocabulary, captions, rendering, the seeded plan of videos
    formats.py    the sources' formats: HD-VG metadata, Pexels objects and listings, Inter4k zips
    handler.py    the wire side: replies, Range, injected faults, the request handler
    server.py     SampleServer: the loopback HTTP server's state and routes
    plug.py       sample_source(cfg, root): start the server for a run, point the sources at it
    adherence.py  the shape / colour / direction scorer for generated videos
"""
