/* store_process.h — the rendezvous store served from a separate process for the distributed tests.
 *
 * The tests fork rank processes; forking a process whose other threads may hold allocator locks
 * (the store's threads) can deadlock the child under sanitizers. So the store runs in a process of
 * its own, forked while the test is still single-threaded, and tells its port through a pipe. */
#ifndef STRATA_TESTS_STORE_PROCESS_H
#define STRATA_TESTS_STORE_PROCESS_H

#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "store.h"

/* returns the server's pid (> 0) and its port, or -1 */
static pid_t store_process_start(const char *token, int *port) {
  int fds[2];
  if (pipe(fds)) return -1;
  sigset_t term, old;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  sigprocmask(SIG_BLOCK, &term, &old); /* the child waits for SIGTERM with sigwait */
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    st_error err;
    st_store_server *srv = NULL;
    int p = -1;
    if (st_store_server_start("127.0.0.1", 0, token, &srv, &err) == ST_OK) p = st_store_server_port(srv);
    else fprintf(stderr, "store process: %s\n", err.message);
    if (write(fds[1], &p, sizeof p) != (ssize_t)sizeof p) _exit(1);
    close(fds[1]);
    int sig = 0;
    sigwait(&term, &sig);
    st_store_server_stop(srv);
    _exit(0);
  }
  sigprocmask(SIG_SETMASK, &old, NULL);
  close(fds[1]);
  int p = -1;
  if (pid < 0 || read(fds[0], &p, sizeof p) != (ssize_t)sizeof p || p <= 0) {
    close(fds[0]);
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, NULL, 0);
    }
    return -1;
  }
  close(fds[0]);
  *port = p;
  return pid;
}

static void store_process_stop(pid_t pid) {
  if (pid <= 0) return;
  kill(pid, SIGTERM);
  waitpid(pid, NULL, 0);
}

#endif
