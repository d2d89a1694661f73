"""Coverage-guided fuzzing of the daemon's and the Manager's input surfaces.

``fuzz.targets`` holds one function per surface; ``python -m fuzz TARGET`` runs one
under atheris (``make fuzz``); ``fuzz/corpus/<target>/`` holds the committed corpus
that ``tests/fuzz/test_corpus_replay.py`` replays. ``docs/fuzzing.md`` says more.
"""

__all__: list[str] = []
