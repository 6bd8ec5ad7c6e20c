#!/usr/bin/env python3
"""A paho-mqtt 2 client for the broker tests: connects, subscribes, publishes (each
step waiting for its acknowledgement), optionally stays until the server disconnects
it, and prints what the server answered as one JSON object:

  {"connack": 0, "subacks": [[0], [135]], "pubacks": [0, 135], "disconnect": null}

Reason codes are numbers (MQTT 5 reason codes; for 3.1.1 the CONNACK return code and
the SUBACK granted QoS or 128).
"""
import argparse
import json
import ssl
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--version", choices=["4", "5"], default="4")
p.add_argument("--username")
p.add_argument("--password")
p.add_argument("--keepalive", type=int, default=30)
p.add_argument("--client-id", default="")
p.add_argument("--cafile", help="connect with TLS, trusting this CA")
p.add_argument("--subscribe", action="append", default=[],
               help="FILTER, or FILTER,FILTER,... in one SUBSCRIBE")
p.add_argument("--publish", action="append", default=[], help="TOPIC=PAYLOAD")
p.add_argument("--qos", type=int, default=1)
p.add_argument("--alias", action="store_true",
               help="MQTT 5: publish under topic alias 1, naming each topic only the first time")
p.add_argument("--idle", type=float, default=0, help="seconds to stay idle before publishing")
p.add_argument("--until-disconnected", type=float, default=0,
               help="then wait this long for the server to disconnect")
p.add_argument("--timeout", type=float, default=15)
a = p.parse_args()

version = mqtt.MQTTv5 if a.version == "5" else mqtt.MQTTv311
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=a.client_id, protocol=version)
if a.username is not None:
    c.username_pw_set(a.username, a.password)
if a.cafile:
    c.tls_set(ca_certs=a.cafile, cert_reqs=ssl.CERT_REQUIRED)

out = {"connack": None, "subacks": [], "pubacks": [], "disconnect": None}
ev = {k: threading.Event() for k in ("connack", "suback", "puback", "disconnect")}


def code(rc):
    return rc.value if hasattr(rc, "value") else int(rc)


def on_connect(client, userdata, flags, rc, props):
    out["connack"] = code(rc)
    ev["connack"].set()


def on_subscribe(client, userdata, mid, rcs, props):
    out["subacks"].append([code(r) for r in rcs])
    ev["suback"].set()


def on_publish(client, userdata, mid, rc, props):
    out["pubacks"].append(code(rc))
    ev["puback"].set()


def on_disconnect(client, userdata, flags, rc, props):
    # paho may report a server's DISCONNECT, then the closed socket: keep the first.
    if out["disconnect"] is None:
        out["disconnect"] = code(rc)
    ev["disconnect"].set()
    if not ev["connack"].is_set():
        ev["connack"].set()


c.on_connect, c.on_subscribe, c.on_publish, c.on_disconnect = (
    on_connect, on_subscribe, on_publish, on_disconnect)


def wait(name):
    if not ev[name].wait(a.timeout):
        out["error"] = f"no {name} within {a.timeout}s"
        finish(2)
    ev[name].clear()


def finish(status=0):
    print(json.dumps(out), flush=True)
    sys.exit(status)


try:
    c.connect("127.0.0.1", a.port, keepalive=a.keepalive)
except Exception as e:  # TLS failures end here
    out["error"] = f"{type(e).__name__}: {e}"
    finish(1)
c.loop_start()
wait("connack")
if out["connack"] != 0:
    finish(1)
for f in a.subscribe:
    c.subscribe([(one, 1) for one in f.split(",")])
    wait("suback")
if a.idle:
    if ev["disconnect"].wait(a.idle):
        out["error"] = "disconnected while idle"
        finish(1)
aliases = {}  # topic -> its alias
for item in a.publish:
    topic, payload = item.split("=", 1)
    properties = None
    if a.alias:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        properties = Properties(PacketTypes.PUBLISH)
        if topic in aliases:
            properties.TopicAlias, topic = aliases[topic], ""
        else:
            aliases[topic] = properties.TopicAlias = len(aliases) + 1
    c.publish(topic, payload, qos=a.qos, properties=properties)
    if a.qos:
        wait("puback")
if a.until_disconnected:
    ev["disconnect"].wait(a.until_disconnected)
    finish(0)
c.disconnect()
c.loop_stop()
finish(0)
