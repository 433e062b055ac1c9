"""A TCP proxy in front of a server that dies like the server would: after forwarding N HTTP PUT
requests it drops every connection and stops listening (a storage server killed mid-push).

    python dying_proxy.py --listen PORT --target PORT --die-after-puts N
Prints "READY" once listening; exits when it dies (or on SIGTERM).
"""
import argparse
import asyncio
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--die-after-puts", type=int, default=0, help="0 = never")
    args = ap.parse_args()
    puts = 0
    writers = []

    async def pipe(reader, writer, count_puts):
        nonlocal puts
        try:
            while data := await reader.read(65536):
                if count_puts:
                    puts += data.count(b"PUT /")
                writer.write(data)
                await writer.drain()
                if args.die_after_puts and puts >= args.die_after_puts:
                    for w in writers:
                        w.transport.abort()
                    os._exit(0)
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
