"""Real VNC client plumbing for capvm's e2e tests (tests/src/real_vnc.rs runs this file).

Subcommands, each printing one result line on stdout:

  capture HOST::PORT OUT.png [--bpp 32|16] [--encoding raw|zrle] [--timeout S] [--password P]
          [--match M]...
      vncdotool (not capvm's code) connects, asks for the whole screen and saves it as a PNG.
      --bpp 16 makes vncdotool ask for its own 16-bpp format (BGR16 in vncdotool.client: RGB565,
      little endian), which it otherwise picks only for Apple Remote Desktop; vncdotool then
      decodes the server's 16-bit pixels itself. Prints "captured WxH".
  xgrab DISPLAY OUT.png [--match M]...
      Pillow grabs the whole screen of X display DISPLAY (XCB) into a PNG. Prints "grabbed WxH".

--match R,G,B,TOLERANCE (repeatable) then counts the picture's pixels whose every channel is
within TOLERANCE of (R, G, B) and prints "match R,G,B,TOLERANCE count N box X0 Y0 X1 Y1 size W
H" (the bounding box of those pixels, X1/Y1 exclusive; all -1 if none). Matching in the same
process as the capture saves a Python start, which is slow inside the emulated test host.
"""

import sys


def capture(server, out, bpp, encoding, timeout, matches, password=None):
    from vncdotool import api, client, rfb

    class Client(client.VNCDoToolClient):
        def setImageMode(self):
            if bpp == 16:
                self.setPixelFormat(client.BGR16)
                self._image_mode = client.PF2IM[client.BGR16]
            else:
                super().setImageMode()

    Client.encoding = rfb.Encoding.ZRLE if encoding == "zrle" else rfb.Encoding.RAW

    class Factory(client.VNCDoToolFactory):
        protocol = Client

    conn = api.connect(server, password=password, factory_class=Factory, timeout=timeout)
    try:
        conn.captureScreen(out)
        screen = conn.protocol.screen
        print(f"captured {screen.width}x{screen.height} format={conn.protocol.pixel_format}")
    finally:
        conn.disconnect()
        api.shutdown()
    report_matches(out, matches)


def xgrab(display, out, matches):
    from PIL import ImageGrab

    image = ImageGrab.grab(xdisplay=display)
    image.save(out)
    print(f"grabbed {image.width}x{image.height}")
    report_matches(out, matches)


def report_matches(path, matches):
    from PIL import Image

    image = Image.open(path).convert("RGB")
    for m in matches:
        r, g, b, tolerance = (int(v) for v in m.split(","))
        print(f"match {m} {match(image, (r, g, b), tolerance)}")


def match(image, rgb, tolerance):
    """Pillow's C loops, not Python's: a pixel loop takes a minute in the emulated test host."""
    from PIL import ImageChops

    masks = [
        band.point(lambda v, c=c: 255 if abs(v - c) <= tolerance else 0)
        for band, c in zip(image.split(), rgb)
    ]
    mask = ImageChops.darker(ImageChops.darker(masks[0], masks[1]), masks[2])
    count = mask.histogram()[255]
    box = mask.getbbox() or (-1, -1, -1, -1)
    width, height = image.size
    return f"count {count} box {box[0]} {box[1]} {box[2]} {box[3]} size {width} {height}"


def option(args, name, default):
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i : i + 2]
        return value
    return default


def main(argv):
    args = list(argv[1:])
    if not args:
        sys.exit(__doc__)
    command = args.pop(0)
    matches = []
    while "--match" in args:
        matches.append(option(args, "--match", None))
    if command == "capture":
        bpp = int(option(args, "--bpp", "32"))
        encoding = option(args, "--encoding", "raw")
        timeout = float(option(args, "--timeout", "60"))
        password = option(args, "--password", None)
        server, out = args
        capture(server, out, bpp, encoding, timeout, matches, password)
    elif command == "xgrab":
        display, out = args
        xgrab(display, out, matches)
    else:
        sys.exit(f"unknown command {command!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
