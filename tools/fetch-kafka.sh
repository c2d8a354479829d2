#!/usr/bin/env bash
# Fetch the Apache Kafka broker jars (KRaft) with Maven into the local cache and print the libs dir.
#   ${IOT_CACHE:-$HOME/.cache/iot-platform}/kafka-<version>/libs
# The version comes from tools/kafka/pom.xml. Idempotent: a marker file records a complete download.
# Run it as: java -cp '<libs>/*' kafka.Kafka server.properties   (see cloud/nativestack.py)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom="$here/kafka/pom.xml"
# slf4j-api 2.x: Maven's nearest-wins picks slf4j-api 1.7.36 (kafka-clients), which cannot see the
# log4j-slf4j2-impl binding, so Kafka would log nothing. We add the 2.x API and drop the 1.x one.
slf4j_version="2.0.16"

[ -f "$pom" ] || { echo "fetch-kafka: $pom not found" >&2; exit 1; }
version="$(sed -n 's:.*<kafka\.version>[[:space:]]*\([^<[:space:]]*\)[[:space:]]*</kafka\.version>.*:\1:p' "$pom" | head -n1)"
[ -n "$version" ] || { echo "fetch-kafka: no <kafka.version> in $pom" >&2; exit 1; }

cache="${IOT_CACHE:-$HOME/.cache/iot-platform}"
dest="$cache/kafka-$version"
libs="$dest/libs"
marker="$dest/.complete"
stamp="kafka=$version slf4j=$slf4j_version pom=$(cksum < "$pom" | cut -d' ' -f1)"

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$stamp" ] && ls "$libs"/kafka_2.13-"$version".jar >/dev/null 2>&1; then
    echo "$libs"
    exit 0
fi

command -v mvn >/dev/null 2>&1 || {
    echo "fetch-kafka: Maven (mvn) is required to fetch Kafka $version; install it (apt-get install -y maven)" >&2
    exit 1
}
command -v java >/dev/null 2>&1 || echo "fetch-kafka: warning: no java on PATH; Kafka needs Java 17+" >&2

mkdir -p "$libs"
rm -f "$marker"
echo "fetch-kafka: fetching Kafka $version into $libs" >&2
mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$libs" >&2
if ls "$libs"/slf4j-api-1.*.jar >/dev/null 2>&1; then
    mvn -q -B -f "$pom" dependency:copy -Dartifact="org.slf4j:slf4j-api:$slf4j_version" -DoutputDirectory="$libs" >&2
    rm -f "$libs"/slf4j-api-1.*.jar
fi
ls "$libs"/kafka_2.13-"$version".jar >/dev/null 2>&1 || { echo "fetch-kafka: kafka_2.13-$version.jar missing after download" >&2; exit 1; }
echo "$stamp" > "$marker"
echo "$libs"
