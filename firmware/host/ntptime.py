# Host (unix port) stand-in for `ntptime`: the host clock is already NTP-disciplined, so settime()
# only checks that the (fake) network is up. NTP_DELTA/host/timeout exist for API compatibility.


host = "pool.ntp.org"
timeout = 1
NTP_DELTA = 2208988800


def time():
    import network
    if not network.WLAN(network.STA_IF).isconnected():
        raise OSError(113)  # EHOSTUNREACH
    import time as _t
    return int(_t.time()) + NTP_DELTA


def settime():
    time()
