#!/usr/bin/env python3
"""The score of a cargo-mutants run (its outcomes.json), as Markdown: the
share of viable mutants the tests caught (a timeout counts as caught: the
tests hung on it), per file and in all, and every survivor by name.
Usage: mutants_score.py OUTCOMES SECONDS ARGS"""
import collections
import json
import sys


def main(path, seconds, args):
    with open(path) as f:
        lab = json.load(f)
    per_file = collections.defaultdict(collections.Counter)
    missed = []
    for outcome in lab["outcomes"]:
        scenario = outcome["scenario"]
        if not isinstance(scenario, dict) or "Mutant" not in scenario:
            continue
        mutant = scenario["Mutant"]
        summary = outcome["summary"]
        per_file[mutant["file"]][summary] += 1
        if summary == "MissedMutant":
            missed.append(mutant["name"])
    detected = lab["caught"] + lab["timeout"]
    viable = detected + lab["missed"]
    score = 100.0 * detected / viable if viable else 100.0
    print("# Mutation testing (`make mutants`)\n")
    print(f"- cargo-mutants {lab['cargo_mutants_version']}, arguments: `{args or '(all)'}`, "
          f"{int(seconds) // 60} min on this machine.")
    print(f"- **Score: {score:.1f} %** of viable mutants caught "
          f"({lab['caught']} caught, {lab['timeout']} timed out, {lab['missed']} missed; "
          f"{lab['unviable']} unviable of {lab['total_mutants']}). Target: 90 %.\n")
    print("| file | caught | timed out | missed | unviable |")
    print("| --- | --- | --- | --- | --- |")
    for file, counts in sorted(per_file.items()):
        print(f"| `{file}` | {counts['CaughtMutant']} | {counts['Timeout']} | "
              f"{counts['MissedMutant']} | {counts['Unviable']} |")
    if missed:
        print("\nSurvivors (each is killed by a test or explained in docs/mutants.md):\n")
        for name in missed:
            print(f"- `{name}`")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
