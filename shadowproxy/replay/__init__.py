"""``shadowproxy replay``: send recorded requests to a new target and store its answers.

The answers are stored beside the recorded ones (``responses.role = 'replay'``), so that
``shadowproxy.pairs`` and the report read a replayed target like a live shadow. Modules:

    options   the command line, checked into one ``ReplayOptions``
    source    the SQL: which requests, what they hold, streamed with a server-side cursor
    outgoing  one recorded request → the bytes sent to the target
    pacing    when each request leaves: as recorded, at a fixed rate, or unpaced
    call      the upstream call capturing the target's answer (compiled with the data path)
    replayer  reading ahead, pacing, sending and recording, with Ctrl-C handling
    progress  the progress bar and the summary
    command   the CLI entry: resolve, preflight, run, summarise, exit status
"""
