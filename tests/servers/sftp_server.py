"""A real SFTP server for tests (asyncssh): 127.0.0.1 only, public-key authentication only, SFTP only
(no shell or exec), chrooted to --root. Prints "READY <port>" once listening; stops on SIGTERM.

    python sftp_server.py --root DIR --authorized-keys client.pub --host-key host_key [--port 0]
"""
import argparse
import asyncio
import signal

import asyncssh


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--root", required=True)
    ap.add_argument("--authorized-keys", required=True)
    ap.add_argument("--host-key", required=True)
    args = ap.parse_args()

    class Server(asyncssh.SSHServer):
        def password_auth_supported(self) -> bool:
            return False

        def kbdint_auth_supported(self) -> bool:
            return False

    async def serve() -> None:
        server = await asyncssh.listen("127.0.0.1", args.port, server_factory=Server,
                                       server_host_keys=[args.host_key], authorized_client_keys=args.authorized_keys,
                                       sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=args.root),
                                       allow_scp=False)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
