/* One-line error messages for the C API (every failure returns a status and a message). */
#ifndef BN_ERROR_H
#define BN_ERROR_H

#include <stddef.h>

/* printf-style message into buf[len]; buf may be NULL or len 0 (the caller did not ask for text). */
void bn_set_error(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
