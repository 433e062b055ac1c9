"""A TCP proxy in front of a server that dies like the server would: at the first HTTP PUT whose
request line contains a given text it drops every connection and stops listening, before forwarding
that request (a storage server killed mid-push).

    python dying_proxy.py --listen PORT --target PORT [--die-on-put TEXT]
Prints "READY" once listening; exits when it dies (or on SIGTERM).
"""
import argparse
import asyncio
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--die-on-put", default=None, help="text of a PUT request line that kills it (default: never)")
    args = ap.parse_args()
    marker = args.die_on_put.encode() if args.die_on_put else None
    writers = []

    def fatal(data: bytes) -> bool:
        return any(line.startswith(b"PUT /") and marker in line for line in data.split(b"\r\n"))

    async def pipe(reader, writer, from_client):
        try:
            while data := await reader.read(65536):
                if from_client and marker and fatal(data):
                    for w in writers:
                        w.transport.abort()
                    os._exit(0)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", args.target)
        writers.extend([client_writer, server_writer])
        await asyncio.gather(pipe(client_reader, server_writer, True), pipe(server_reader, client_writer, False))

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
        print("READY", flush=True)
        await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
