# Soak driver, run by the MicroPython unix binary (see soak.py): the firmware's own link.Link (the class main.py
# uses) doing QoS 1 publishes against a real broker.
#
#   micropython soak_driver.py HOST PORT CYCLES SAMPLE_EVERY
#
# stdout lines: "heap <cycle> <free>" for each sample (gc.collect() then gc.mem_free()), "err <cycle> <msg>" for
# each failed publish (and the loop stops at the first), and last "done <json>".
import gc
import sys
import time
import json

from link import Link

host = sys.argv[1]
port = int(sys.argv[2])
cycles = int(sys.argv[3])
every = int(sys.argv[4])

cfg = {"mqtt": {"host": host, "port": port, "tls": False, "ca": None, "user": None, "password": None,
                "keepalive": 30}}
link = Link(cfg, "soak", 1, "soak")
t0 = time.ticks_ms()
while not link.connect():
    if time.ticks_diff(time.ticks_ms(), t0) > 10000:
        print("err 0 cannot connect")
        sys.exit(2)
    time.sleep_ms(50)

topic = link.t_telemetry
errors = 0
pid_wraps = 0
last_pid = link.client.pid
gc.collect()
print("heap 0 %d" % gc.mem_free())
t0 = time.ticks_ms()
done = 0
for i in range(1, cycles + 1):
    if not link.publish(topic, '{"seq":%d}' % i):
        errors += 1
        print("err %d publish failed" % i)
        break
    pid = link.client.pid
    if pid < last_pid:
        pid_wraps += 1
    last_pid = pid
    done = i
    if i % 64 == 0:
        link.poll()  # what the main loop does between publishes (keepalive, inbound packets)
    if i % every == 0 or i == cycles:
        gc.collect()
        print("heap %d %d" % (i, gc.mem_free()))
elapsed_ms = time.ticks_diff(time.ticks_ms(), t0)
link.goodbye("soak done")
print("done " + json.dumps({"cycles": done, "errors": errors, "elapsed_ms": elapsed_ms, "pid_wraps": pid_wraps,
                            "last_pid": last_pid, "platform": sys.platform}))
