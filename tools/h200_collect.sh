#!/usr/bin/env bash
# Copy what the background measurement (tools/h200_measure.sh) has written so far back as one file.
tar czf "$OUT/res.tgz" -C /tmp res 2>/dev/null
cat /tmp/res/progress 2>/dev/null
current=$(ls -t /tmp/res/*.log 2>/dev/null | head -1)
[ -n "$current" ] && { echo "--- $current"; tail -n 15 "$current"; }
