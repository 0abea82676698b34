// The real node's pod sandbox ("pause") process: containerd's default sandbox image cannot be
// pulled here, so build.sh builds this static binary and start.sh imports it as an image. It
// holds the pod's namespaces, reaps the children it inherits as the pod's PID 1, and exits on
// SIGTERM or SIGINT, as upstream's pause does.
//
// The same image is the tests' smallest workload: `pause serve <port>` also accepts TCP
// connections on the port (a readiness probe's target), and `pause connect <host:port>
// <seconds>` is their network probe: it tries to open a TCP connection until one opens
// (exit 0) or the time is up (exit 1), printing what it saw.
package main

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) == 4 && os.Args[1] == "connect" {
		os.Exit(connect(os.Args[2], os.Args[3]))
	}
	if len(os.Args) == 3 && os.Args[1] == "serve" {
		listener, err := net.Listen("tcp", ":"+os.Args[2])
		if err != nil {
			fmt.Fprintf(os.Stderr, "cannot listen on port %s: %v\n", os.Args[2], err)
			os.Exit(1)
		}
		go func() {
			for {
				conn, err := listener.Accept()
				if err != nil {
					return
				}
				conn.Close()
			}
		}()
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

func connect(addr, seconds string) int {
	limit, err := strconv.Atoi(seconds)
	if err != nil {
		fmt.Fprintf(os.Stderr, "not a number of seconds: %q\n", seconds)
		return 2
	}
	deadline := time.Now().Add(time.Duration(limit) * time.Second)
	for attempt := 1; ; attempt++ {
		conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			fmt.Printf("connected to %s (%s) at attempt %d\n", addr, conn.RemoteAddr(), attempt)
			conn.Close()
			return 0
		}
		if time.Now().After(deadline) {
			fmt.Printf("no connection to %s after %d attempts: %v\n", addr, attempt, err)
			return 1
		}
		time.Sleep(500 * time.Millisecond)
	}
}
