#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft) from Maven Central jars, on loopback, under .firstmile/services/.
#   deploy/local/kafka.sh start [test|bench|fault]   fetch jars once (mvn), format once, start (idempotent)
#   deploy/local/kafka.sh stop  [test|bench]
#   deploy/local/kafka.sh url   [test|bench]   print the bootstrap servers (PLAINTEXT)
#   deploy/local/kafka.sh sasl-url [test|bench]  print the SASL_PLAINTEXT (SCRAM-SHA-512) listener
# The jars are cached in .firstmile/services/kafka-libs (and Maven's ~/.m2); the broker needs Java 17+.
set -euo pipefail

cmd=${1:-start}
name=${2:-test}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
libs="$root/.firstmile/services/kafka-libs"
dir="$root/.firstmile/services/kafka-$name"
case "$name" in
  test) port=${FIRSTMILE_TEST_KAFKA_PORT:-59092} ;;
  bench) port=${FIRSTMILE_BENCH_KAFKA_PORT:-59192} ;;
  fault) port=${FIRSTMILE_FAULT_KAFKA_PORT:-29292} ;;  # restarted mid-run: below the ephemeral range (see below)
  *) echo "unknown broker '$name' (test, bench or fault)" >&2; exit 2 ;;
esac
controller_port=$((port + 1))
sasl_port=$((port + 2))

fetch_jars() {
  local want
  # the Kafka version and the pom's digest: a changed pom (another logging jar) fetches again
  want="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml") $(sha256sum "$here/kafka/pom.xml" | cut -c1-12)"
  if [ -f "$libs/.complete" ] && [ "$(cat "$libs/.complete")" = "$want" ]; then return; fi
  command -v mvn >/dev/null || { echo "mvn is needed to fetch Kafka (apt-get install maven)" >&2; exit 1; }
  echo "fetching Apache Kafka $want and its dependencies from Maven Central" >&2
  rm -rf "$libs.tmp" && mkdir -p "$libs.tmp"
  mvn -q -f "$here/kafka/pom.xml" dependency:copy-dependencies -DoutputDirectory="$libs.tmp" >&2
  rm -rf "$libs" && mv "$libs.tmp" "$libs" && echo "$want" > "$libs/.complete"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running_pid() {
  if [ -f "$dir/broker.pid" ] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then cat "$dir/broker.pid"; fi
}

case "$cmd" in
  url)
    echo "127.0.0.1:$port"
    ;;
  sasl-url)
    echo "127.0.0.1:$sasl_port"
    ;;
  start)
    if [ -n "$(running_pid)" ]; then echo "kafka ($name) already running on 127.0.0.1:$port" >&2; exit 0; fi
    fetch_jars
    mkdir -p "$dir/logs"
    sed -e "s:@PORT@:$port:g" -e "s:@CONTROLLER_PORT@:$controller_port:g" -e "s:@SASL_PORT@:$sasl_port:g" \
      -e "s:@DATA@:$dir/data:g" \
      "$here/kafka/server.properties.in" > "$dir/server.properties"
    if [ ! -f "$dir/data/meta.properties" ]; then
      java -cp "$libs/*" -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml" -Dkafka.logs.dir="$dir/logs" \
        kafka.tools.StorageTool format -t "$(cat /proc/sys/kernel/random/uuid | tr -d - | head -c 22)" \
        -c "$dir/server.properties" >"$dir/logs/format.log" 2>&1
    fi
    # Up to three attempts: the test and bench ports sit in Linux's ephemeral range (32768-60999), so a client
    # socket of a busy test run can hold one for a moment and the broker exits at bind; a later attempt gets it.
    # The fault broker, restarted mid-run, is below the range: a long-lived connection held its port once for
    # all three attempts.
    for attempt in 1 2 3; do
      nohup java -Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml" -Dkafka.logs.dir="$dir/logs" \
        -cp "$libs/*" kafka.Kafka "$dir/server.properties" >"$dir/logs/stdout.log" 2>&1 &
      echo $! > "$dir/broker.pid"
      for _ in $(seq 1 120); do
        if port_open "$port"; then echo "kafka ($name) started on 127.0.0.1:$port" >&2; exit 0; fi
        if ! kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then break; fi
        sleep 0.5
      done
      if kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then
        echo "kafka ($name) did not open 127.0.0.1:$port in 60 s; see $dir/logs" >&2; exit 1
      fi
      echo "kafka ($name) exited during start (attempt $attempt of 3); see $dir/logs" >&2
      tail -n 20 "$dir/logs/stdout.log" >&2 || true
      grep -h -E "ERROR|FATAL|Exception" "$dir/logs/server.log" 2>/dev/null | tail -n 5 >&2 || true
      sleep 1
    done
    exit 1
    ;;
  stop)
    pid=$(running_pid)
    if [ -n "$pid" ]; then
      kill "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/broker.pid"
      echo "kafka ($name) stopped" >&2
    fi
    ;;
  *)
    echo "usage: $0 start|stop|url|sasl-url [test|bench|fault]" >&2; exit 2 ;;
esac
