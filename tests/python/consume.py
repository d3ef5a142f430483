"""A consumer of the checkout's events outside Rust, as a team integrating
by events would write one: pika for AMQP, classes generated from proto/ by
protoc (grpcio-tools), the CloudEvents attributes from the AMQP headers.

It generates the classes into a temporary directory, binds an exclusive
queue of its own to the events exchange with routing key `#`, prints
{"ready": true} once bound, then one JSON line per message: the AMQP
properties, the headers, the decoded payload, and how many fields of it
this consumer's classes do not know. It runs until it is killed.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile

import pika
from google.protobuf import json_format
from google.protobuf.unknown_fields import UnknownFieldSet


def generate(proto_dir, out_dir):
    sources = [
        os.path.join("shop", "events", "v1", "events.proto"),
        os.path.join("shop", "types", "v1", "money.proto"),
    ]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir,
         "--python_out", out_dir, *sources],
        check=True,
        stdout=sys.stderr,
    )
    sys.path.insert(0, out_dir)
    return importlib.import_module("shop.events.v1.events_pb2")


def text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--proto-dir", required=True)
    args = parser.parse_args()

    # Once imported, the generated modules live in memory; the directory
    # goes at once (the test stops this process with a kill).
    with tempfile.TemporaryDirectory(prefix="shop-events-") as generated:
        events = generate(args.proto_dir, generated)

    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(queue=queue, exchange=args.exchange, routing_key="#")

    def on_message(channel, method, properties, body):
        headers = {key: text(value) for key, value in (properties.headers or {}).items()}
        event_type = headers.get("cloudEvents_type") or properties.type
        record = {
            "routing_key": method.routing_key,
            "message_id": properties.message_id,
            "type": properties.type,
            "app_id": properties.app_id,
            "content_type": properties.content_type,
            "correlation_id": properties.correlation_id,
            "headers": headers,
        }
        cls = getattr(events, event_type.rsplit(".", 1)[-1], None) if event_type else None
        if cls is None or cls.DESCRIPTOR.full_name != event_type:
            record["error"] = f"no generated class for {event_type!r}"
        else:
            try:
                message = cls.FromString(body)
                record["payload"] = json_format.MessageToDict(
                    message, preserving_proto_field_name=True)
                record["unknown_fields"] = len(UnknownFieldSet(message))
            except Exception as error:  # a payload that does not decode
                record["error"] = f"{type(error).__name__}: {error}"
        print(json.dumps(record, sort_keys=True), flush=True)
        channel.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_consume(queue=queue, on_message_callback=on_message)
    print(json.dumps({"ready": True}), flush=True)
    channel.start_consuming()


if __name__ == "__main__":
    main()
