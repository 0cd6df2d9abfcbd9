"""python -m ring_jax.job: batch inference over a JSONL file, on one process or many (SPMD).

Each non-blank input line is a JSON object with one of
    "prompt": text (tokenized as is; with --chat, rendered as a user message by the chat template),
    "messages": a chat, [{"role": ..., "content": ...}, ...] (always through the chat template),
    "input_ids": token ids,
and optionally "id" (any JSON value, echoed). Process 0 writes one JSON line per input line, in
input order:
    {"line": n, "id": ..., "output": text, "output_ids": [...], "num_tokens": k,
     "finish_reason": "stop" | "length"}
or, for a line that cannot run (invalid JSON, no prompt field, ids outside the vocabulary, too long
for max_position_embeddings, ...), {"line": n, "id": ..., "error": "..."} (also reported on stderr).
"line" is the 1-based line number; "id" appears when the input has one. output_ids run up to and
including the end-of-sequence token ("stop") or are max_new_tokens long ("length"); "output" is
their text without it and without special tokens.

Batches: the runnable prompts are cut into windows of --sort-window batches, sorted by length within
a window (less padding) and split into batches of --batch-size. The batches depend on the input
alone, so a resumed run computes the same batches as an uninterrupted one.

Crash safety and resume: records are appended in input order as soon as every earlier line's record
is ready (later ones wait in memory), and the file is flushed and fsynced after each batch. When the
output file exists, the job keeps its complete records (a truncated last line is dropped), skips
their lines and appends the rest: the final file equals an uninterrupted run's. A sidecar file
`<output>.job.json` holds a fingerprint of the prompts and the settings that shape the outputs; a
rerun whose fingerprint differs (another input, --max-new-tokens, sampling, batching) refuses to
append to the file.

Multi-process (SPMD): start the same command on every host, with --coordinator HOST:PORT (process
0's address) --num-processes N --process-id I, or with --distributed auto where
jax.distributed.initialize() finds the processes itself (Cloud TPU pods, SLURM, Open MPI). Every
process reads the whole input (give each the same file) and calls generate() with the same batches;
the model and the batch are split over the --mesh of all processes' devices. Only process 0 reads
and writes the output file (it need not be on a shared filesystem); it broadcasts how many records
the file already holds to the others. Progress and bad lines are reported on process 0's stderr.

    python -m ring_jax.job --model ring-mini-jax/ --input in.jsonl --output out.jsonl --chat
    (2 hosts of 8 GPUs: that, plus --mesh data=2,expert=8 --coordinator host0:1234
     --num-processes 2 --process-id 0 on host0 and --process-id 1 on the other)
"""

from ring_jax.job.command import main, parse_args, run

__all__ = ["main", "parse_args", "run"]
