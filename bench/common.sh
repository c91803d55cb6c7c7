# Shell helpers shared by the bench scripts (sourced, not run).

# wait_port PORT: waits up to 10 s for a listener on 127.0.0.1:PORT.
wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "port $1 did not open" >&2
  return 1
}
