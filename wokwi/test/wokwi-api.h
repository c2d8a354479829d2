// Minimal stand-in for Wokwi's wokwi-api.h, just enough to compile and unit-test a chip natively with gcc.
#pragma once
#include <stdbool.h>
#include <stdint.h>
typedef int32_t pin_t;
typedef uint32_t i2c_dev_t;
enum { INPUT = 0, OUTPUT = 1, INPUT_PULLUP = 2, INPUT_PULLDOWN = 3, ANALOG = 4 };
typedef struct {
  void *user_data;
  uint32_t address;
  pin_t scl;
  pin_t sda;
  bool (*connect)(void *user_data, uint32_t address, bool connect);
  uint8_t (*read)(void *user_data);
  bool (*write)(void *user_data, uint8_t data);
  void (*disconnect)(void *user_data);
  uint32_t reserved[8];
} i2c_config_t;
i2c_dev_t i2c_init(const i2c_config_t *config);
pin_t pin_init(const char *name, uint32_t mode);
uint32_t attr_init(const char *name, uint32_t default_value);
uint32_t attr_init_float(const char *name, float default_value);
uint32_t attr_read(uint32_t attr_id);
float attr_read_float(uint32_t attr_id);
uint64_t get_sim_nanos(void);
