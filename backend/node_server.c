/* node_server.c -- placeholder until implemented. */
#include "node_server.h"
