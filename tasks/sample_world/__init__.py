"""The synthetic sample source: coloured shapes moving in known directions, with true captions,
served on 127.0.0.1 in the formats of the real sources (HD-VG metadata + videos, an Inter4k-style
zip behind a redirect, a Pexels-compatible API).

    scenes.py  vocabulary, captions, rendering, the seeded plan of videos
    server.py  SampleServer: the loopback HTTP server, with fault injection for tests
"""
