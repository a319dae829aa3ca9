"""Graph layer: the op table, pattern matching, preprocessing passes and the command applier."""
